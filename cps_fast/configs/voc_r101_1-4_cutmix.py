"""PASCAL VOC 2012 (train_aug, 10582 images), DeepLabv3+ ResNet-101, 1/4 labeled (2646 images), CPS with CutMix.

Recipe from TorchSemiSeg exp.voc/voc8.res50v3+.CPS+CutMix/config.py and the launch script;
docs/presets.md explains every number and where cps-fast differs on purpose.
"""
dataset = "voc"
num_classes = 21
partition = "1/4"
train_labeled = "subset_train_aug/train_aug_labeled_1-4.txt"
train_unlabeled = "subset_train_aug/train_aug_unlabeled_1-4.txt"
val_list = "val.txt"

backbone = "resnet101"
pretrained = "resnet101_v1c.pth"

crop_size = 512
batch_size_labeled = 8
batch_size_unlabeled = 8
epochs = 40
lr = 0.0025
weight_decay = 4e-4  # reference: 1e-4 at lr 0.0025 x 4 GPUs on a loss divided by 4

cps_weight = 1.0
cutmix = True
sup_loss = "ce"

paper_miou = 77.68
paper_source = "CPS paper Table 1, ResNet-101, w/ CutMix, 1/4; recipe: TorchSemiSeg exp.voc/voc8.res50v3+.CPS+CutMix/config.py"
