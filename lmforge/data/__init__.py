"""Reading user datasets into Conversations: sources.py reads files, formats.py converts records,
datasets.py resolves dataset names (LLaMA-Factory's dataset_info.json) and ties the two together."""
