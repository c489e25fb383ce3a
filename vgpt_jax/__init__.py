"""vgpt_jax: pretrain Video-GPT-style world models (next-clip diffusion) in JAX/Flax."""
