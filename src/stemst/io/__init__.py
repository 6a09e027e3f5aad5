"""stemst.io."""
