"""The kvstore process: the one owner of every staged KV buffer (reserve, transfer, ready,
consumed, aborted or expired) and the data server that moves its bytes."""
