"""The `autoprune-ray` command line: one click group. The commands live by concern in
cli_compress (one model under one protocol) and cli_search (a search and its run directory)."""
from __future__ import annotations

import sys

import click

from autoprune_ray.engine import cli_compress, cli_search


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autoprune-ray")
def main():
    """autoprune-ray: an LLM designs model-compression algorithms and a Ray cluster tests them.

    \b
    Examples:
      autoprune-ray prune --method wanda --sparsity 0.5
      autoprune-ray baselines --sparsity 0.5,0.7 --patterns 2:4
    """


for command in cli_compress.COMMANDS + cli_search.COMMANDS:
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
