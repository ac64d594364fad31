"""Shards in, uint8 clips out: the data contract, video codec functions and the streaming loader."""
