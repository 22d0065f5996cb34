"""What the tests, the demo and the benchmark share, none of it needed to train: `tiny_sd` builds tiny Stable
Diffusion pipelines and small datasets offline; `flag_table` prints the flag tables of docs/flags.md from the
parsers."""
