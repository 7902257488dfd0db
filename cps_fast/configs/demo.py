"""Demo: CPS on the built-in synthetic scenes, small enough for a laptop CPU.

7 classes (background + disks/boxes/triangles, striped or checkered), 1/8 of 512
scenes labeled, a ResNet-18 DeepLabv3+ trained from scratch for 300 iterations.
`cps-fast demo` runs it once with method="supervised" and once with CPS.
"""
dataset = "synthetic"
data_root = "seed=0,n=512,size=128"
num_classes = 7
partition = "1/8"

backbone = "resnet18"
deep_stem = False
output_stride = 16
pretrained = None
sync_bn = False

crop_size = 96
batch_size_labeled = 4
batch_size_unlabeled = 4
scales = (0.75, 1.0, 1.25, 1.5)
max_iters = 300
lr = 0.01

cps_weight = 1.5
cutmix = False
sup_loss = "ce"

amp = "fp32"
cuda_graph = False
data_backend = "pytorch"
num_workers = 2

eval_every = 100
eval_max_items = 128  # keeps the demo's evaluations to seconds
eval_crop_size = 128
log_every = 20
