"""The tiny models and runs the tests use, as config overrides (KEY VALUE lists for ``load_config`` or a tool).

Each list is CPU-sized: a two-branch model of a few thousand parameters, milliseconds per step.
"""

# f_theta with 4- and 8-channel branches at the input resolution (module and model tests).
MODEL_4_8 = [
    "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[4, 8]",
    "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[2, 4]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "8", "MODEL.NUM_GROUPS", "2", "MODEL.EXPANSION_FACTOR", "2",
]

# A classification run of the training tools: two 8-channel branches, 3 solver steps, one log line a step.
# GPUS (0,): TRAIN.BATCH_SIZE_PER_GPU is the whole batch of a step (the shipped yamls name up to 8 GPUs).
# MODEL.CHANNELS_LAST false: the yamls' "auto" decides by timing at each start, which would make runs that are
# compared bit for bit (resume, signals) depend on the machine's load.
CLS_RUN = [
    "GPUS", "(0,)", "MODEL.CHANNELS_LAST", "false",
    "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2",
    "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]",
    "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 8]",
    "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16",
    "MODEL.NUM_GROUPS", "4",
    "MODEL.EXPANSION_FACTOR", "1",
    "MODEL.NUM_LAYERS", "2",
    "DEQ.F_THRES", "3",
    "DEQ.B_THRES", "3",
    "WORKERS", "0",
    "PRINT_FREQ", "1",
    "TENSORBOARD", "False",
]

# A segmentation run: two branches with 8 and 16 channels, on 64x32 images of the tiny Cityscapes fixture.
SEG_RUN = [
    "GPUS", "(0,)", "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16]",
    "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]", "MODEL.EXPANSION_FACTOR", "1", "MODEL.NUM_GROUPS", "2",
    "MODEL.F_THRES", "4", "MODEL.B_THRES", "4", "TRAIN.IMAGE_SIZE", "[64, 32]", "TRAIN.MULTI_SCALE", "False",
    "TRAIN.BATCH_SIZE_PER_GPU", "2", "TEST.IMAGE_SIZE", "[64, 32]", "TEST.BASE_SIZE", "64",
    "TEST.BATCH_SIZE_PER_GPU", "1", "WORKERS", "0", "PRINT_FREQ", "1", "TRAIN.PRETRAIN_STEPS", "1",
    "SEED", "0", "TENSORBOARD", "False", "DEVICE", "cpu",
]
