# RetinaNet R50-FPN 1x on COCO: MMDetection's own config (model, 12-epoch schedule, pipeline),
# inherited unchanged; ssflctl only fills the named parameters below.
# lr 0.01 is mmdet's value for a total batch of 16 (8 GPUs x 2 images): with fewer GPUs either
# keep the lr and accept the difference, set `auto_scale_lr: true`, or scale lr yourself.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

ssflctl_params = dict(
    loss='focal',
    lr=0.01,
    seed=0,
    data_root='data/coco/',
    max_epochs=12,
    batch_size=2,  # per GPU, as in mmdet
    workers=2,
    train_ann='annotations/instances_train2017.json',
    train_img='train2017/',
    val_ann='annotations/instances_val2017.json',
    val_img='val2017/',
    test_ann='annotations/instances_val2017.json',
    test_img='val2017/',
    load_from=None,
    auto_scale_lr=False,
    log_interval=50,
    ckpt_interval=1,
    amp=None,  # mixed precision: 'bf16' | 'fp16' | None (ssflctl/amp.py)
)
