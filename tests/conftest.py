import torch

# Tests are small; two threads is what CI machines have.
torch.set_num_threads(min(2, torch.get_num_threads()))
