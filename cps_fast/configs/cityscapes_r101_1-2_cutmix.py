"""Cityscapes (train, 2975 images), DeepLabv3+ ResNet-101, 1/2 labeled (1488 images), CPS with CutMix.

Recipe from TorchSemiSeg exp.city/city8.res50v3+.CPS+CutMix/config.py and the launch script;
docs/presets.md explains every number and where cps-fast differs on purpose.
"""
dataset = "cityscapes"
num_classes = 19
partition = "1/2"
train_labeled = "config_new/subset_train/train_aug_labeled_1-2.txt"
train_unlabeled = "config_new/subset_train/train_aug_unlabeled_1-2.txt"
val_list = "config_new/val.txt"

backbone = "resnet101"
pretrained = "resnet101_v1c.pth"

crop_size = 800
batch_size_labeled = 8
batch_size_unlabeled = 8
epochs = 240
lr = 0.0025
weight_decay = 8e-4  # reference: 1e-4 at lr 0.02 on 8 GPUs on a loss divided by 8

cps_weight = 5.0
cutmix = True
sup_loss = "ohem"

paper_miou = 80.21
paper_source = "CPS paper Table 2, ResNet-101, w/ CutMix, 1/2; recipe: TorchSemiSeg exp.city/city8.res50v3+.CPS+CutMix/config.py"
