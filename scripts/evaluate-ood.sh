#!/usr/bin/env bash
# The paper's OOD evaluation (cross-site and cross-task).
exec bash "$(dirname "$0")/evaluate-external.sh" OOD "$@"
