"""Redis: the connection and the pipelined client for hot script calls.
Key formats and scripts live with the area that owns them."""
