"""The papers' algorithms as functions on tensors, one file per paper (see each module).

- paper modules: :mod:`~segadapt.methods.cpsl` (CPSL), :mod:`~segadapt.methods.dars` (DARS),
  :mod:`~segadapt.methods.bicl` (BiCL), :mod:`~segadapt.methods.blv` (BLV), and the baseline BLV is
  measured on, :mod:`~segadapt.methods.daformer` (DAFormer's rare-class sampling and feature distance);
- shared by them: :mod:`~segadapt.methods.common` (pixels per class, class prototypes, per-pixel
  KL and entropy), :mod:`~segadapt.methods.sinkhorn` (Sinkhorn-Knopp with unequal marginals),
  :mod:`~segadapt.methods.thresholds` (ST/CBST thresholds, confidence histograms),
  :mod:`~segadapt.methods.ema` (momentum copies of a network).

A paper module imports the shared modules, never another paper module.
"""
