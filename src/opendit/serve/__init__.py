"""``opendit serve``: a local web page to explore a checkpoint (classes by name, sampler, steps, guidance and its
interval, seed, images per class; the grid, its timing, the PNG and the sample_dit.py command that draws the same
image). The server (``app``) uses the standard library only; ``browser`` drives a headless Chromium over the DevTools
pipe, for the page's test and its screenshot."""
