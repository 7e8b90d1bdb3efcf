"""Found by `autoprune-ray run configs/mpq.yaml --set quant.quantizer=gptq --set name=mpq-gptq-s1
--set search.seed=1 --set search.max_evaluations=120 --set search.max_seconds=3600` (the second
search seed of the search that found mpq-3bit.py) on a 2-core CPU, 2026-12-02: 120 evaluations in
37.0 minutes, 167 proposals, 99% valid, 24 measured by validation perplexity (24 distinct), 96
screened by the output-error proxy. Best: candidate #57, written by the LLM (llm_mutate of a
symbolic mutation of the weight-error seed Σ E²). Fitness: validation perplexity at the
uniform-3-bit budget (3.27 bits per weight, group 128), one-pass GPTQ rounding: 112.2, against
161.5 for the Σ E² seed and 1320 for HAWQ.

Read as: the mean squared round-to-nearest error per weight, the same proxy as mpq-3bit.py without
its −10. In float32 the −10 is not free: it rounds mean(E²) to steps of about 1e-6, which is
0.01–0.2% of its value at 2–4 bits (median 1.8e-3 at 3 bits) but about 20% at 8 bits (median
1.4e-6), and the two allocations differ in 9 of 210 layers.

Apply it:  autoprune-ray quantize --program benchmarks/results/discovered/mpq-3bit-s1.py --as-uniform 3 --quantizer gptq"""


def sensitivity(E):
    return square(E).mean(dim=0, keepdim=True).mean(dim=1, keepdim=True)
