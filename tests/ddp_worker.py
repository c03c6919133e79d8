"""Run train.py's training (under torchrun or alone), then save this rank's parameters (for test_shard.py)."""
import os
import sys

import torch

import train

cfg = train.load_config(sys.argv[1:])
model = train.train(cfg)
torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{cfg.out_dir}/rank{os.environ.get('RANK', 0)}.pt")
