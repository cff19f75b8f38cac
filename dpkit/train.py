"""The entry point every launcher starts on each rank (the loop itself is dpkit/run.py).

    torchrun --nproc_per_node N -m dpkit.train RECIPE [key=value ...]
    accelerate launch --config_file ds_configs/accelerate/<x>.yaml -m dpkit.train RECIPE
    deepspeed --num_gpus N --module dpkit.train RECIPE
"""

import sys

from dpkit.run import main

if __name__ == "__main__":
    sys.exit(main())
