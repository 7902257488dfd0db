"""Demo: CPS on the built-in synthetic scenes, small enough for a laptop CPU.

7 classes (background + disks/boxes/triangles, striped or checkered), 1/16 of 512
64x64 scenes labeled (32 images), a ResNet-18 DeepLabv3+ with a 64-channel head
trained from scratch for 500 iterations in bf16 autocast. `cps-fast demo` runs it
once with method="supervised" and once with CPS (same labeled split); on a 2-core
CPU that takes about 6 minutes, and CPS ends about 4 mIoU points above supervised
(tuning run: 32.7 -> 37.2; with 1/8 labeled the gain was only about 2.5).
"""
dataset = "synthetic"
data_root = "seed=0,n=512,size=64"
num_classes = 7
partition = "1/16"

backbone = "resnet18"
deep_stem = False
head_channels = 64
output_stride = 16
pretrained = None
sync_bn = False

crop_size = 64
batch_size_labeled = 8
batch_size_unlabeled = 8
scales = (0.75, 1.0, 1.25)
max_iters = 500
lr = 0.02

cps_weight = 1.5
cutmix = False
sup_loss = "ce"

amp = "bf16"  # also on the CPU (torch.autocast): about half the fp32 step time here
cuda_graph = False
data_backend = "pytorch"
num_workers = 2

eval_every = 100
eval_max_items = 128  # keeps the demo's evaluations to seconds
eval_crop_size = 64
log_every = 20
