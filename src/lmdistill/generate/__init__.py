"""Teacher completions for sequence-level (hard-label) distillation: `lmdistill generate`.

- `config`: GenerateConfig / ServeConfig
- `prompts`: prompt sources (any `datasets` source, or `embedded:wikipedia-questions`)
- `base`: the backend interface; `hf`, `openai_api`, `vllm`: the teachers
- `store`: resumable, fsync'd JSONL; `filters`: think handling, length/duplicate filters, verifiers
- `run`: the command, top to bottom
"""

from lmdistill.generate.config import GenerateConfig, ServeConfig
from lmdistill.generate.run import run_generate

__all__ = ["GenerateConfig", "ServeConfig", "run_generate"]
