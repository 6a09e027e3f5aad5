"""stemst.pp."""
