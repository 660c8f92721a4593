"""File I/O: atomic writes, hashing, the output policy and the strict tensor-file reader."""
