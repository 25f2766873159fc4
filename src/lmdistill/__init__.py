"""lmdistill: train a small student language model from a larger teacher.

Three techniques, one toolkit: soft-label distillation (online or from a sparse soft-label cache),
hard-label distillation (teacher tokens or teacher-written text, local or over an OpenAI-compatible API),
and co-distillation (teacher and student trained together).
"""

__version__ = "0.1.0"
