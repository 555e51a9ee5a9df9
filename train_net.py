#!/usr/bin/env python
"""Train or evaluate any reidzoo / fast-reid model: ``python train_net.py --config-file CFG``."""

from reidzoo.engine import default_argument_parser, launch, main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
