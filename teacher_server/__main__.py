"""``python -m teacher_server serve|describe|health ...`` (no student_client import)."""

import sys

from teacher_server.cli import main

sys.exit(main())
