"""Running kernels: tensor interop, per-call uploads and arguments, tensor maps, the forward and backward launchers."""
