import os

import torch

# The Triton kernels run on CPU tensors through the interpreter when no GPU is present
# (docs/design.md, "Verifying GPU code without a GPU"). The variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
