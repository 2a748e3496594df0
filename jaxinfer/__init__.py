"""jaxinfer: an LLM inference engine on JAX/XLA."""
