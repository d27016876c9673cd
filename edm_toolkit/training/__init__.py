"""Training: any loss x preconditioner x backbone on EDM-layout datasets, with EMA, augmentation, resume and DDP.

Data flow: dataset (EDM's zip/folder layout, sharded per rank) -> augmentation (non-leaking, augment labels) ->
loss (p_train(sigma), lambda(sigma)) -> preconditioned network -> optimizer -> EMA -> snapshots in the toolkit's
own model format, which ``edm generate --network`` reads.
"""
