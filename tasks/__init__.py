"""Pipeline stages (collect, clean, tokenize, pretrain, finetune, evaluate, register).

Each stage module exposes a plain function that follows the stage contract in
`tasks.stage`; the flows wrap them as Prefect tasks.
"""
