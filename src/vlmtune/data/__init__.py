"""The data layer, in the order data flows: sources/ (records → conversations, declared in types.py) and media/
(images, videos) feed stages/ (validate, encode, fit, pack, collate → rows, declared in schema.py), which drivers/
run over a whole dataset."""
