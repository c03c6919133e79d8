"""The measuring tools, apart from the method: bench (speed, FLOPs, MFU, the side-by-side with VideoCrafter and
diffusers), memory (what a training step holds per GPU) and ablation (the paper's study, with error bars).
Run from the repository's root as `python -m tools.NAME`; they import the method's modules, never the reverse."""
