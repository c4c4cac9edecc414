"""fedstack's benchmark tasks as a Flower App (ServerApp + ClientApp, Message API)."""
