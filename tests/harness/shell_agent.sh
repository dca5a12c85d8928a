#!/usr/bin/env bash
# One agent in a mounted volume: read-modify-write increments of self-checking payloads
# (see payload.py), re-reading and retrying after EACCES. Run with COHERENT_AGENT set.
# Environment: MNT, FILES (paths relative to MNT), CROSS (other files read per attempt),
# ATTEMPTS (-1: until STOP exists), FILL (max filler), REC (record file), ERRF, SEED, STOP, and NAME
# (the prefix of its tokens; default: the agent's name).
# Records (read by history.load_shell_records): R path rc|F line / W … / E rc t msg / X target t.
set -u
export LC_ALL=C
RANDOM=$SEED
read -r -a files <<< "$FILES"
n=${#files[@]}
exec {rec}>>"$REC"

read_one() {  # read_one PATH: sets $line and $rc, records R
  local fd
  line="" rc=F
  if { exec {fd}<"$MNT/$1"; } 2>/dev/null; then
    IFS= read -r line <&"$fd" 2>"$ERRF"
    rc=$?
    exec {fd}<&-
    # read(1) fails alike at a last line without newline (torn content) and on an I/O error, but
    # only the error has a message (a mount that no longer answers, a directory where the file
    # was); a file that is gone by now means the mount went away too
    [[ $rc == 0 || ( -e $MNT/$1 && ! -s $ERRF ) ]] || rc=F
  fi
  echo "R $1 $rc $line" >&"$rec"
}

pause() { sleep 0.02; }

for ((i = 0; ATTEMPTS < 0 || i < ATTEMPTS; i++)); do
  [[ -e $STOP ]] && break
  tgt=${files[RANDOM % n]}
  t0=$EPOCHREALTIME
  for ((c = 0; c < CROSS && n > 1; c++)); do
    other=${files[RANDOM % n]}
    [[ $other == "$tgt" ]] || read_one "$other"
  done
  read_one "$tgt"
  set -f; fields=($line); set +f
  if [[ $rc != 0 || ${#fields[@]} -ne 7 || ${fields[0]} != cv1 || ${fields[1]} != "${fields[6]}" ]]; then
    echo "X $tgt $t0" >&"$rec"
    pause
    continue
  fi
  tok="${NAME:-$COHERENT_AGENT}.$i"
  count=$((fields[3] + 1))
  fill=$((RANDOM % (FILL + 1)))
  printf -v filler '%*s' "$fill" ''
  echo "W $tgt $tok ${fields[1]} $count $t0 $EPOCHREALTIME" >&"$rec"
  /usr/bin/printf '%s\n' "cv1 $tok ${fields[1]} $count $fill -${filler// /x} $tok" 2>"$ERRF" >"$MNT/$tgt"
  rc=$?
  t1=$EPOCHREALTIME
  msg=""
  [[ $rc -ne 0 ]] && IFS= read -r msg < "$ERRF"
  echo "E $rc $t1 $msg" >&"$rec"
  [[ $rc -eq 0 || $msg == *"Permission denied"* ]] || pause
done
