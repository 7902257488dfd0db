"""PASCAL VOC 2012 (train_aug, 10582 images), DeepLabv3+ ResNet-50, 1/16 labeled (662 images), CPS without CutMix.

Recipe from TorchSemiSeg model/voc8.res50v3+.CPS/config.py and the launch script;
docs/presets.md explains every number and where cps-fast differs on purpose.
"""
dataset = "voc"
num_classes = 21
partition = "1/16"
train_labeled = "subset_train_aug/train_aug_labeled_1-16.txt"
train_unlabeled = "subset_train_aug/train_aug_unlabeled_1-16.txt"
val_list = "val.txt"

backbone = "resnet50"
pretrained = "resnet50_v1c.pth"

crop_size = 512
batch_size_labeled = 8
batch_size_unlabeled = 8
epochs = 32
lr = 0.0025
weight_decay = 4e-4  # reference: 1e-4 at lr 0.0025 x 4 GPUs on a loss divided by 4

cps_weight = 1.5
cutmix = False
sup_loss = "ce"

paper_miou = 68.21
paper_source = "CPS paper Table 1, ResNet-50, w/o CutMix, 1/16; recipe: TorchSemiSeg model/voc8.res50v3+.CPS/config.py"
