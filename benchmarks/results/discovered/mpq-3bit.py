"""Found by `autoprune-ray run configs/mpq.yaml --set quant.quantizer=gptq --set name=mpq-gptq`
(40 evaluations in 14.5 minutes), resumed with `--set search.max_evaluations=120 --set
search.max_seconds=3600` (to 120 in another 28.7 minutes) on a 2-core CPU, 2026-12-01: 157
proposals, 96% valid, 45 measured by validation perplexity, of which only 20 distinct allocations;
the rest screened by the output-error proxy or failed. Best: candidate #10, written by the LLM
(llm_init). Fitness: validation perplexity of the model its ILP allocation builds at the
uniform-3-bit budget (3.27 bits per weight, group 128), rounded by one-pass GPTQ: 111.9, against 161.5 for the weight-error seed Σ E² and 1320 for HAWQ.

Read as: E is a layer's round-to-nearest error at one bit width, and E * maximum(E, E) = E², so
this is the weight-error seed Σ E² divided by the layer's number of weights. The −10 is the same
for every layer and width, but not free in float32: it rounds mean(E²) to steps of about 1e-6
(about 20% of its value at 8 bits), and the allocation differs from exact mean(E²)'s
(mpq-3bit-s1.py, the second search seed's best) in 9 of 210 layers. Per weight rather than per layer, it no
longer charges a large layer more for the same rounding error, so the ILP keeps bits in the small
attention projections and takes them from the wide MLP ones. Its rank correlation with the
measured one-layer sensitivity is negative (Spearman −0.39 on the search's 16 sampled layers).

Apply it:  autoprune-ray quantize --program benchmarks/results/discovered/mpq-3bit.py --as-uniform 3 --quantizer gptq"""


def sensitivity(E):
    return (-10.0) + (E * maximum(E, E)).mean(dim=0, keepdim=True).mean(dim=1, keepdim=True)
