"""`training.train` recording which process writes model weights: `accelerate launch` runs this in a test.

Every rank reaches `save_pretrained`; only the one passing `is_main_process=True` writes (transformers' contract).
"""

import os
import sys

import torch
from accelerate import PartialState

from deit_hf import DeiTForImageClassificationWithTeacher
from training import train

_save_pretrained = DeiTForImageClassificationWithTeacher.save_pretrained


def recorded_save_pretrained(self, *args, is_main_process: bool = True, **kwargs):
    if is_main_process:
        with open(os.environ["SAVE_PROBE_FILE"], "a") as probe:
            probe.write(f"{PartialState().process_index}\n")
    return _save_pretrained(self, *args, is_main_process=is_main_process, **kwargs)


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on two cores
    DeiTForImageClassificationWithTeacher.save_pretrained = recorded_save_pretrained
    trainer = train.main(sys.argv[1:])
    if trainer.args.process_index == 0:
        print("WORLD_SIZE", trainer.args.world_size, "DISTRIBUTED", trainer.accelerator.distributed_type.value)
