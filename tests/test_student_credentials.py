"""Student-side TLS credentials live in student_client: no teacher_server import, student errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from student_client.credentials import TeacherCredentials
from student_client.errors import ConfigError
from tests.helpers.certs import TestCA
from tests.helpers.teacher_proc import REPO_ROOT


def test_a_tls_channel_factory_does_not_import_teacher_server(tmp_path):
    # DESIGN: student_client imports teacher_server only where a student also serves.
    ca = TestCA(tmp_path)
    client = ca.issue("student", client=True)
    code = textwrap.dedent(f"""
        import sys
        from student_client import DistillReader, TeacherCredentials, TeacherPool
        factory = TeacherCredentials(tls_ca={ca.cert!r}, tls_cert={client.cert!r}, tls_key={client.key!r},
                                     auth_token="tok-123").channel_factory()
        factory("127.0.0.1:1", []).close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "teacher_server")
        print("teacher_server modules:", loaded)
        sys.exit(1 if loaded else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("field", "expected"),
    [("tls_ca", "tls_ca '{path}' is not a PEM certificate file"),
     ("tls_cert", "tls_cert '{path}' is not a PEM certificate file"),
     ("tls_key", "tls_key '{path}' is not a PEM private key file")],
)
def test_a_file_that_is_not_pem_is_a_student_config_error(tmp_path, field, expected):
    ca = TestCA(tmp_path)
    client = ca.issue("student", client=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem file: s3cret-content")
    files = {"tls_ca": ca.cert, "tls_cert": client.cert, "tls_key": client.key, field: str(junk)}
    with pytest.raises(ConfigError) as info:
        TeacherCredentials(**files).channel_factory()
    assert expected.format(path=junk) in str(info.value)
    assert "s3cret-content" not in str(info.value)
    assert type(info.value).__module__ == "student_client.errors" and info.value.__cause__ is None
