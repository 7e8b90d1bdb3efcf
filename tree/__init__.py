"""The expression tree of candidate programs: nodes, shapes and the torch reference evaluator.

The lowest room: the language parses into it, compress evaluates it, kernels generate code from it.
It imports nothing of the project."""
