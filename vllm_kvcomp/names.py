"""Names the plugin shares with vLLM, importable without vLLM or torch."""

# the attention backend's name: --attention-backend kvcomp, AttentionBackendEnum.KVCOMP
BACKEND_NAME = "KVCOMP"
# a layer's full-precision window is the virtual sub-layer "<layer><RESIDUAL_SUFFIX>"
RESIDUAL_SUFFIX = ".kvcomp_residual"
# a layer's streaming heads (head map) are the virtual sub-layer "<layer><STREAM_SUFFIX>"
STREAM_SUFFIX = ".kvcomp_stream"
# "1" runs the GPU path (Triton kernels) on CPU tensors, for testing the kernel wiring
FORCE_TRITON_ENV = "KVCOMP_FORCE_TRITON"
