# RetinaNet R50-FPN on Cityscapes with MMDetection's Cityscapes detection recipe: the 8 classes,
# train scales 2048x800-1024 (test 2048x1024), RepeatDataset x8, 8 epochs (= 64 passes), lr 0.01
# for a total batch of 8 (mmdet: 8 GPUs x 1 image), 500-iteration linear warm-up, x0.1 after
# epoch 7. `load_from` may point at a COCO RetinaNet checkpoint (mmdet's recipe starts from COCO);
# without it the backbone starts from ImageNet (torchvision://resnet50).
# Data: mmdet's layout, annotations from `ssflctl convert cityscapes`.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/cityscapes_detection.py',
    'mmdet::_base_/default_runtime.py',
]

ssflctl_params = dict(
    loss='focal',
    lr=0.01,
    seed=0,
    data_root='data/cityscapes/',
    max_epochs=8,
    batch_size=8,  # per GPU; 8 on one GPU keeps mmdet's total batch of 8
    workers=4,
    repeat=8,
    train_ann='annotations/instancesonly_filtered_gtFine_train.json',
    train_img='leftImg8bit/train/',
    val_ann='annotations/instancesonly_filtered_gtFine_val.json',
    val_img='leftImg8bit/val/',
    test_ann='annotations/instancesonly_filtered_gtFine_val.json',
    test_img='leftImg8bit/val/',
    load_from=None,
    auto_scale_lr=False,
    log_interval=50,
    ckpt_interval=1,
    amp=None,  # mixed precision: 'bf16' | 'fp16' | None (ssflctl/amp.py)
)
ssflctl_bindings = dict(repeat=['train_dataloader.dataset.times'])

model = dict(bbox_head=dict(num_classes=8))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=8, by_epoch=True, milestones=[7], gamma=0.1),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=8, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
load_from = None
auto_scale_lr = dict(enable=False, base_batch_size=8)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3))
