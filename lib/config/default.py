"""Default values of every configuration key.

Every key that an experiment file of the original MDEQ project or of its second generation uses is defined
here, each with a one-line comment. The defaults reproduce the original project's behaviour; new behaviour is
opt-in by key. Shapes are written ``[width, height]`` as in the original files.
"""
from yacs.config import CfgNode as CN

_C = CN()

# ----------------------------------------------------------------------------------------------- top level
_C.OUTPUT_DIR = "output"  # checkpoints go to OUTPUT_DIR/<dataset>/<config name>/
_C.LOG_DIR = "log"  # text logs and TensorBoard events go to LOG_DIR/<dataset>/<config name>/
_C.DATA_DIR = ""  # prefix joined in front of DATASET.ROOT when DATASET.ROOT is relative (original --dataDir)
_C.GPUS = (0,)  # GPUs of the original run: sets the global batch (x BATCH_SIZE_PER_GPU); devices come from DEVICE
_C.WORKERS = 4  # data-loader worker processes per training process
_C.PERCENT = 1.0  # fraction of the training set to use (original --percent)
_C.PRINT_FREQ = 20  # log a training line every PRINT_FREQ steps
_C.AUTO_RESUME = False  # resume from the newest valid checkpoint in the output folder if one exists
_C.PIN_MEMORY = True  # pin host memory in data loaders when training on CUDA
_C.RANK = 0  # kept for compatibility; the process rank comes from the launcher's environment
_C.DEVICE = "auto"  # "auto" (CUDA when present, else CPU), "cpu", or "cuda"
_C.SEED = -1  # random seed for torch, numpy and python; -1 leaves the generators unseeded
_C.DETERMINISTIC = False  # force deterministic kernels and single-threaded data order (for exact resume checks)
_C.TENSORBOARD = True  # write TensorBoard scalars next to the text log

# --------------------------------------------------------------------------------------------------- cudnn
_C.CUDNN = CN()
_C.CUDNN.BENCHMARK = True  # let cuDNN pick the fastest convolution algorithms (GPU only)
_C.CUDNN.DETERMINISTIC = False  # ask cuDNN for deterministic algorithms (GPU only)
_C.CUDNN.ENABLED = True  # use cuDNN at all (GPU only)

# --------------------------------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.NAME = "mdeq"  # model family; only "mdeq" exists
_C.MODEL.INIT_WEIGHTS = True  # initialise convolutions from N(0, 0.01) as the original does
_C.MODEL.WNORM = False  # weight-normalise the convolutions of f_theta (stored as weight_g / weight_v)
_C.MODEL.PRETRAINED = ""  # transfer initialisation (e.g. ImageNet -> Cityscapes); keys the model lacks are dropped
_C.MODEL.NUM_JOINTS = 17  # unused (inherited from the pose-estimation code the original grew from)
_C.MODEL.NUM_LAYERS = 5  # applications of f_theta in the weight-tied unrolled (pretraining) mode
_C.MODEL.NUM_GROUPS = 4  # GroupNorm groups inside f_theta (post-fusion norms use NUM_GROUPS // 2)
_C.MODEL.DROPOUT = 0.0  # variational dropout rate inside f_theta; one mask per forward pass
_C.MODEL.NUM_CLASSES = 1000  # classifier outputs (classification)
_C.MODEL.F_THRES = 30  # forward solver iteration cap (original key; alias of DEQ.F_THRES: config.resolve_alias)
_C.MODEL.B_THRES = 40  # backward solver iteration cap (original key; alias of DEQ.B_THRES: config.resolve_alias)
_C.MODEL.DOWNSAMPLE_TIMES = 2  # stride-2 convolutions in the stem (0, 1 or 2)
_C.MODEL.EXPANSION_FACTOR = 5  # width multiplier of the first convolution of each residual block
_C.MODEL.TAG_PER_JOINT = True  # unused (pose-estimation leftover)
_C.MODEL.TARGET_TYPE = "gaussian"  # unused (pose-estimation leftover)
_C.MODEL.IMAGE_SIZE = [256, 256]  # classification input size [width, height]
_C.MODEL.HEATMAP_SIZE = [64, 64]  # unused (pose-estimation leftover)
_C.MODEL.SIGMA = 2  # unused (pose-estimation leftover)
_C.MODEL.IN_CHANNELS = 0  # image channels; 0 takes them from the dataset (1 for Fashion-MNIST, else 3)
_C.MODEL.BLOCK_GN_AFFINE = True  # affine GroupNorms inside the residual blocks (second generation option)
_C.MODEL.FUSE_GN_AFFINE = True  # affine GroupNorms in the multiscale fusion (second generation option)
_C.MODEL.POST_GN_AFFINE = True  # affine GroupNorms after the fusion (second generation option)
_C.MODEL.BN_MOMENTUM = -1.0  # BatchNorm momentum; -1 takes the original's (0.1 classification, 0.01 segmentation)
_C.MODEL.CHANNELS_LAST = "false"  # channels_last memory format: true, false, or auto (a probe at start picks the faster)
_C.MODEL.COMPILE = False  # torch.compile f_theta (inductor); faster on GPUs, slower backward on CPUs (README)

_C.MODEL.EXTRA = CN()
_C.MODEL.EXTRA.FINAL_CONV_KERNEL = 1  # kernel of the segmentation head's last convolution (1 or 3)
_C.MODEL.EXTRA.FULL_STAGE = CN()
_C.MODEL.EXTRA.FULL_STAGE.NUM_MODULES = 1  # MDEQ has exactly one f_theta module
_C.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES = 4  # number of resolutions
_C.MODEL.EXTRA.FULL_STAGE.BLOCK = "BASIC"  # residual block type; only BASIC exists
_C.MODEL.EXTRA.FULL_STAGE.BIG_KERNELS = []  # per branch: how many of the block's two convs are 5x5 (empty: none)
_C.MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS = []  # per branch: bottleneck width of the classification head
_C.MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE = 2048  # channels of the classification head's final 1x1 layer
_C.MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS = [1, 1, 1, 1]  # per branch: residual blocks
_C.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS = [32, 64, 128, 256]  # per branch: channels of the equilibrium state
_C.MODEL.EXTRA.FULL_STAGE.FUSE_METHOD = "SUM"  # how resolutions are fused; only SUM exists

# ---------------------------------------------------------------------------------------- equilibrium solve
_C.DEQ = CN()
_C.DEQ.F_SOLVER = "broyden"  # forward solver: broyden, lbroyden, anderson, fixed_point
_C.DEQ.B_SOLVER = "broyden"  # backward (adjoint) solver: broyden, lbroyden, anderson, fixed_point
_C.DEQ.STOP_MODE = "abs"  # residual used for stopping: "abs" ||f(z)-z|| or "rel" ||f(z)-z|| / ||f(z)||
_C.DEQ.F_THRES = 30  # forward iteration cap (second generation; alias of MODEL.F_THRES: config.resolve_alias)
_C.DEQ.B_THRES = 40  # backward iteration cap (second generation; alias of MODEL.B_THRES: config.resolve_alias)
_C.DEQ.B_CAP = "forward"  # backward cap: "forward" (original: the forward cap, B_THRES unused) or "b_thres"
_C.DEQ.F_EPS = -1.0  # forward tolerance; -1: abs 1e-5*sqrt(N) (N = B*D batch scope, D sample scope), rel 1e-3
_C.DEQ.B_EPS = -1.0  # backward tolerance; -1: abs 2e-10*sqrt(N) (N as for F_EPS), rel 1e-3
_C.DEQ.STOP_SCOPE = "batch"  # "batch" (originals: one residual, whole batch stops, best batch iterate) or "sample"
_C.DEQ.STALL_STEPS = 30  # stop when residual < 3 tol and the last N residuals vary < 1.3x (originals: 30; 0: off)
_C.DEQ.KEEP_START = True  # the solve's start is a candidate result (original); False: second generation's
_C.DEQ.ADJOINT_INIT = "zeros"  # adjoint solve starts at "zeros" (originals) or at the incoming "grad"
_C.DEQ.ADJOINT_AT = "f_z"  # Jacobian of the adjoint solve at "f_z" = f(z*) (original) or at "z" = z* (second gen.)
_C.DEQ.EVAL_F_THRES = 0  # forward iteration cap at evaluation; 0 uses F_THRES
_C.DEQ.RAND_F_THRES_DELTA = 0  # in training, draw the forward cap at random (see RAND_F_THRES_MODE); 0: fixed
_C.DEQ.RAND_F_THRES_MODE = "jac_steps"  # "jac_steps": on Jacobian-loss steps, cap-delta..cap+1; "every_step": +-delta
_C.DEQ.SPECTRAL_RADIUS_MODE = False  # estimate the spectral radius of df/dz at z* during evaluation (slow)
_C.DEQ.LBROYDEN_MEM = 27  # rank-one updates Broyden keeps (original: 27; what happens past it: LBROYDEN_OVERFLOW)
_C.DEQ.LBROYDEN_OVERFLOW = "circular"  # past LBROYDEN_MEM: "circular" (original), "window" (newest pairs), "restart"
_C.DEQ.ANDERSON_M = 5  # history size of Anderson acceleration
_C.DEQ.ANDERSON_BETA = 1.0  # mixing parameter of Anderson acceleration
_C.DEQ.ANDERSON_LAM = 1e-4  # Tikhonov regularisation of Anderson's least-squares system
_C.DEQ.BACKWARD = "implicit"  # gradient through z*: "implicit" (adjoint solve) or "phantom" (damped unroll)
_C.DEQ.PHANTOM_STEPS = 5  # phantom gradient: unrolled steps from z*
_C.DEQ.PHANTOM_TAU = 0.5  # phantom gradient: damping z <- tau * f(z) + (1 - tau) * z
_C.DEQ.CHECK_EVERY = 0  # solvers check for convergence every N iterations (0: 1 on CPU, 4 on GPU; fewer syncs)
_C.DEQ.CUDA_GRAPH = False  # CUDA: the forward solve replays f from a CUDA graph per batch shape (off: eager)
_C.DEQ.WARM_START = False  # evaluation only: start the solve from the last batch's z* when shapes match

# ----------------------------------------------------------------------------------------------------- loss
_C.LOSS = CN()
_C.LOSS.USE_OHEM = False  # online hard example mining for segmentation
_C.LOSS.OHEMTHRES = 0.9  # OHEM: pixels predicted with probability above this are "easy"
_C.LOSS.OHEMKEEP = 100000  # OHEM: keep at least this many pixels per batch
_C.LOSS.CLASS_BALANCE = True  # segmentation: weight the cross-entropy with the dataset's class weights
_C.LOSS.TOPK = 8  # unused (pose-estimation leftover)
_C.LOSS.USE_TARGET_WEIGHT = True  # unused (pose-estimation leftover)
_C.LOSS.USE_DIFFERENT_JOINTS_WEIGHT = False  # unused (pose-estimation leftover)
_C.LOSS.JAC_LOSS_WEIGHT = 0.0  # weight of the Jacobian regulariser ||df/dz||_F^2 in equilibrium mode
_C.LOSS.JAC_LOSS_FREQ = 0.0  # probability that a training step computes the Jacobian loss
_C.LOSS.JAC_INCREMENTAL = 0  # in equilibrium mode the Jacobian weight grows by 0.1 every this many steps (0: constant)
_C.LOSS.PRETRAIN_JAC_LOSS_WEIGHT = 0.0  # weight of the Jacobian regulariser during unrolled pretraining
_C.LOSS.JAC_LOSS_VECS = 2  # random probe vectors of the Jacobian-loss estimate (second generation: 2)
_C.LOSS.PRETRAIN_JAC_AT = "detached"  # unrolled: Jacobian loss at a "detached" copy of the last state or the "last" f
_C.LOSS.JAC_STOP_EPOCH = 100000  # no Jacobian loss from this epoch on

# -------------------------------------------------------------------------------------------------- dataset
_C.DATASET = CN()
_C.DATASET.ROOT = ""  # dataset folder (relative paths are taken from the working directory or DATA_DIR)
_C.DATASET.DATASET = "mpii"  # cifar10, imagenet, fashion_mnist, cityscapes
_C.DATASET.TRAIN_SET = "train"  # training split (a list file for Cityscapes)
_C.DATASET.NUM_CLASSES = 1000  # segmentation classes
_C.DATASET.TEST_SET = "valid"  # evaluation split (a list file for Cityscapes)
_C.DATASET.DATA_FORMAT = "jpg"  # image format (informational)
_C.DATASET.HYBRID_JOINTS_TYPE = ""  # unused (pose-estimation leftover)
_C.DATASET.SELECT_DATA = False  # unused (pose-estimation leftover)
_C.DATASET.EXTRA_TRAIN_SET = ""  # segmentation: list file trained on during the EXTRA_EPOCH epochs
_C.DATASET.AUGMENT = True  # classification: random crop and flip for CIFAR-10 / Fashion-MNIST training
_C.DATASET.PAD_TO = 0  # Fashion-MNIST: black border up to this side (32: CIFAR's 32x32); 0 keeps 28x28
_C.DATASET.GRAY_TO_RGB = False  # Fashion-MNIST: repeat the gray channel into 3 (to train models built for RGB)
_C.DATASET.DOWNLOAD = True  # torchvision datasets: try to download when the files are missing
_C.DATASET.SKIP_BAD_FILES = False  # skip (with a warning) images or labels that cannot be read, instead of failing
_C.DATASET.FLIP = True  # unused (pose-estimation leftover)
_C.DATASET.SCALE_FACTOR = 0.25  # unused (pose-estimation leftover)
_C.DATASET.ROT_FACTOR = 30  # unused (pose-estimation leftover)
_C.DATASET.PROB_HALF_BODY = 0.0  # unused (pose-estimation leftover)
_C.DATASET.NUM_JOINTS_HALF_BODY = 8  # unused (pose-estimation leftover)
_C.DATASET.COLOR_RGB = False  # unused (pose-estimation leftover)

# ---------------------------------------------------------------------------------------------------- train
_C.TRAIN = CN()
_C.TRAIN.IMAGE_SIZE = [1024, 512]  # segmentation crop size [width, height]
_C.TRAIN.BASE_SIZE = 2048  # segmentation: long side the random rescale is relative to
_C.TRAIN.DOWNSAMPLERATE = 1  # segmentation: labels are downsampled by this factor
_C.TRAIN.FLIP = True  # segmentation: random horizontal flips
_C.TRAIN.MULTI_SCALE = True  # segmentation: random rescale by 0.5 .. 0.5 + SCALE_FACTOR / 10
_C.TRAIN.SCALE_FACTOR = 16  # segmentation: range of the random rescale (in tenths)
_C.TRAIN.CLIP = -1.0  # clip the gradient norm to this value; <= 0 disables clipping
_C.TRAIN.LR_FACTOR = 0.1  # step / multistep schedulers: multiply the rate by this at each step
_C.TRAIN.LR_STEP = [90, 110]  # step / multistep schedulers: epochs at which the rate drops
_C.TRAIN.LR = 0.001  # base learning rate
_C.TRAIN.LR_SCHEDULER = "step"  # cosine (per step), step, multistep, poly (the original segmentation rule), none
_C.TRAIN.EXTRA_LR = 0.001  # segmentation: learning rate of the EXTRA_EPOCH epochs
_C.TRAIN.WARMUP_STEPS = 0  # linear learning-rate warm-up over this many steps (0: none)
_C.TRAIN.OPTIMIZER = "adam"  # sgd, adam, adamw, rmsprop
_C.TRAIN.MOMENTUM = 0.9  # sgd / rmsprop momentum
_C.TRAIN.WD = 0.0001  # weight decay
_C.TRAIN.NESTEROV = False  # sgd: Nesterov momentum
_C.TRAIN.GAMMA1 = 0.99  # rmsprop smoothing constant (alpha)
_C.TRAIN.GAMMA2 = 0.0  # unused (kept for compatibility)
_C.TRAIN.PRETRAIN_STEPS = 100000  # steps of weight-tied unrolled training before the equilibrium mode
_C.TRAIN.IGNORE_LABEL = -1  # segmentation: label value that carries no loss
_C.TRAIN.BEGIN_EPOCH = 0  # first epoch (a resumed run takes it from the checkpoint)
_C.TRAIN.END_EPOCH = 140  # training stops before this epoch
_C.TRAIN.EXTRA_EPOCH = 0  # segmentation: extra epochs on DATASET.EXTRA_TRAIN_SET after END_EPOCH
_C.TRAIN.RESUME = False  # continue from OUTPUT_DIR/.../checkpoint.pth.tar when it exists
_C.TRAIN.CHECKPOINT = ""  # resume from this checkpoint file instead of the default one
_C.TRAIN.MODEL_FILE = ""  # initialise every parameter from this file (strict)
_C.TRAIN.BATCH_SIZE_PER_GPU = 32  # samples per GPU of the original; a step takes BATCH_SIZE_PER_GPU x len(GPUS) in all
_C.TRAIN.ACCUM_STEPS = 0  # micro-batches per step in each process (0: the original per-GPU batches where possible)
_C.TRAIN.PRETRAIN_COUNT = "scheduler"  # PRETRAIN_STEPS counts scheduler steps (original: epochs for step/multistep) or steps
_C.TRAIN.PERCENT_MODE = "per_epoch"  # PERCENT < 1: per_epoch (original: fresh random part, full schedule) or fixed
_C.TRAIN.SHUFFLE = True  # shuffle the training set each epoch
_C.TRAIN.NUM_SAMPLES = 0  # segmentation: use only the first N training samples (0: all)
_C.TRAIN.MAX_BAD_STEPS = 20  # stop after this many consecutive skipped (NaN/Inf/diverged) steps
_C.TRAIN.SKIP_DIVERGED = False  # also skip steps whose forward solve diverged (residual NaN/Inf)
_C.TRAIN.CHECKPOINT_EVERY_STEPS = 0  # additionally write checkpoint.pth.tar every N steps (0: once per epoch)
_C.TRAIN.ALIGN_CORNERS = True  # segmentation: align_corners of logit upsampling in loss and validation (original)
_C.TRAIN.AMP = False  # bf16 autocast on CUDA (opt-in; measured in benchmarks/)
_C.TRAIN.STOP_SIGNALS = ["SIGTERM", "SIGUSR1"]  # on these, save a resumable checkpoint and exit with status 3
_C.TRAIN.REQUEUE = False  # after such a stop under SLURM, ask SLURM to requeue the job (scontrol requeue)
_C.TRAIN.OVERWRITE = False  # let a fresh run replace the checkpoints of another run in its output folder

# ----------------------------------------------------------------------------------------------------- test
_C.TEST = CN()
_C.TEST.BATCH_SIZE_PER_GPU = 32  # evaluation batch size of one process
_C.TEST.IMAGE_SIZE = [2048, 1024]  # segmentation test size [width, height]
_C.TEST.BASE_SIZE = 2048  # segmentation: long side for the multi-scale test
_C.TEST.NUM_SAMPLES = 0  # segmentation: evaluate only the first N samples (0: all)
_C.TEST.FLIP_TEST = False  # segmentation: average with the horizontally flipped prediction
_C.TEST.POST_PROCESS = False  # unused (pose-estimation leftover)
_C.TEST.SHIFT_HEATMAP = False  # unused (pose-estimation leftover)
_C.TEST.MULTI_SCALE = False  # segmentation, prob fusion: use TEST.SCALE_LIST (the original fusion always does)
_C.TEST.CENTER_CROP_TEST = False  # segmentation: evaluate a centre crop of TEST.IMAGE_SIZE
_C.TEST.SCALE_LIST = [1]  # segmentation: scales of the multi-scale test
_C.TEST.FUSION = "original"  # segmentation test: original (logit flip, exp summed) or prob (probabilities averaged)
_C.TEST.ALIGN_CORNERS = False  # segmentation test: align_corners of logit upsampling in seg_test (original: False)
_C.TEST.FLIP_TRAIN_STEP = 0  # original fusion: train_step of the flipped pass (0: unrolled as the original; -1: solved)
_C.TEST.USE_GT_BBOX = False  # unused (pose-estimation leftover)
_C.TEST.IMAGE_THRE = 0.1  # unused (pose-estimation leftover)
_C.TEST.NMS_THRE = 0.6  # unused (pose-estimation leftover)
_C.TEST.SOFT_NMS = False  # unused (pose-estimation leftover)
_C.TEST.OKS_THRE = 0.5  # unused (pose-estimation leftover)
_C.TEST.IN_VIS_THRE = 0.0  # unused (pose-estimation leftover)
_C.TEST.COCO_BBOX_FILE = ""  # unused (pose-estimation leftover)
_C.TEST.BBOX_THRE = 1.0  # unused (pose-estimation leftover)
_C.TEST.MODEL_FILE = ""  # evaluate (or start from) this checkpoint (original --testModel); strict
_C.TEST.SAVE_PREDICTIONS = False  # segmentation: write colourised predictions and overlays of the val split
_C.TEST.OUTPUT_DIR = ""  # segmentation: where predictions are written ('' = next to the log)

# ---------------------------------------------------------------------------------------------------- debug
_C.DEBUG = CN()
_C.DEBUG.DEBUG = False  # verbose solver logging
_C.DEBUG.SAVE_BATCH_IMAGES_GT = False  # unused (pose-estimation leftover)
_C.DEBUG.SAVE_BATCH_IMAGES_PRED = False  # unused (pose-estimation leftover)
_C.DEBUG.SAVE_HEATMAPS_GT = False  # unused (pose-estimation leftover)
_C.DEBUG.SAVE_HEATMAPS_PRED = False  # unused (pose-estimation leftover)


def get_default_config() -> CN:
    """Returns a fresh, unfrozen copy of the defaults."""
    return _C.clone()
