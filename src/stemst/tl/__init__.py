"""stemst.tl."""
