"""What runs inside the session container: runs Claude Code and numbers its output lines."""
