"""Anchor programs for ``raypod bench``: the same work launched by other systems.

``common`` holds the model, FSDP2 sharding and step that both anchors run;
``torchrun_gpt`` is started by ``torch.distributed.run`` and ``ray_train_v2`` by a
Ray Train V2 ``TorchTrainer``.
"""
