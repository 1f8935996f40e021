"""vLLM model classes with routed decoder layers."""
