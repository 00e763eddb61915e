"""The papers' algorithms as functions on tensors, one file per paper (see each module)."""
