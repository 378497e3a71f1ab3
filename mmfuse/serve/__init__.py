"""The OpenAI-compatible server: ``mmfuse-serve ckpt=<model dir> port=<n>``."""
