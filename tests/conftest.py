import os

import torch

# Without a GPU the Triton kernel tests run under the interpreter. The variable must be set
# before anything imports triton: triton.language builds its own @jit helpers (tl.zeros,
# tl.sum, ...) at import time, in whichever mode is on then, and transformers or peft may
# import triton while other test directories are being collected.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Tests are small; two threads is what CI machines have.
torch.set_num_threads(min(2, torch.get_num_threads()))
