"""Where samples come from: files, dataset_info entries and Hub ids read as a stream of records, each record layout
converted to the normalised conversation (data/types.py), ids planned, several datasets mixed."""
