"""Anchor programs for ``raypod bench``: the same work launched by other systems.

``sharded`` holds what every anchor rank does (FSDP2 on a CPU mesh, the micro-batched
step); ``common`` (tiny.yaml's GPT) and ``mlp_common`` (mlp.yaml's MLP, DCP checkpoints,
the step log, the kill) build on it. ``torchrun_gpt``, ``mlp_torchrun`` and ``mlp_steps``
are started by ``torch.distributed.run``; ``ray_train_v2``, ``mlp_ray_train``,
``mlp_ray_train_steps`` and ``elastic_ray_train`` by a Ray Train V2 ``TorchTrainer``
(``ray_fit`` starts the first three alike); ``raypod_steps`` and ``plain_steps`` run
raypod and a plain PyTorch loop under the step-time suites.
"""
