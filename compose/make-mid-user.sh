#!/bin/sh
# Add a broker user for one MID (or for the platform) and render its ACL block.
#
#   compose/make-mid-user.sh AGENT [USER]        user USER (default mid.user.AGENT) serves AGENT
#   compose/make-mid-user.sh --platform [USER]   the platform's user (default platform)
#
# The password comes from $MID_PASSWORD if it is set, else mosquitto_passwd asks for it
# (twice). Running the script again for the same user and agent sets a new password and
# leaves the ACL as it is; a user already serving another agent is refused.
# A MID also gets USER.bulk, USER.express and USER.out, with the same password: the
# bridge's sessions with broker.session_users on (compose/mosquitto-secure.conf binds a
# client id to its user with use_username_as_clientid, so no user takes another's session).
#
# Files (mode 600) in $MOSQUITTO_AUTH_DIR, default compose/mosquitto/auth: `passwords`
# (mosquitto_passwd) and `acl` (rendered from compose/mosquitto/*.acl.template). Topics start
# with $TOPIC_PREFIX, default ecc (the bridges' bridge.topic_prefix). A running Mosquitto
# reads both files again on SIGHUP. See docs/security.md, "The broker: mid.user and ACLs".
set -eu

here=$(cd "$(dirname "$0")" && pwd)
templates="$here/mosquitto"
auth_dir=${MOSQUITTO_AUTH_DIR:-$here/mosquitto/auth}
prefix=${TOPIC_PREFIX:-ecc}
passwd_bin=${MOSQUITTO_PASSWD:-mosquitto_passwd}

die() {
    echo "make-mid-user: $*" >&2
    exit 2
}

usage() {
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# valid TEXT REGEX: TEXT is one line and matches the extended REGEX as a whole.
valid() {
    [ "$(printf '%s' "$1" | tr -d '\n')" = "$1" ] && printf '%s\n' "$1" | grep -Eqx "$2"
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
case $1 in
-h | --help) usage ;;
--platform)
    kind=platform
    agent=
    user=${2:-platform}
    session_users=
    marker="# platform as $user"
    ;;
-*) usage ;;
*)
    kind=mid
    agent=$1
    user=${2:-mid.user.$1}
    marker="# mid $agent as $user"
    session_users="$user.bulk $user.express $user.out"
    valid "$agent" '[A-Za-z0-9_.-]{1,64}' ||
        die "agent must be 1-64 of A-Z a-z 0-9 _ . - (as bridge.agent), got '$agent'"
    ;;
esac
# No ':' (the password file's separator), no blank (the ACL's), no '+' '#' '/' either.
valid "$user" '[A-Za-z0-9_.@-]{1,128}' ||
    die "user must be 1-128 of A-Z a-z 0-9 _ . @ -, got '$user'"
valid "$prefix" '[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*' ||
    die "TOPIC_PREFIX must be topic levels of A-Z a-z 0-9 _ . - joined by /, got '$prefix'"
command -v "$passwd_bin" >/dev/null 2>&1 ||
    die "$passwd_bin not found: install Mosquitto (Debian: apt-get install mosquitto) or run this script in the eclipse-mosquitto:2.0 image"

umask 077
mkdir -p "$auth_dir"
passwords="$auth_dir/passwords"
acl="$auth_dir/acl"
[ -e "$passwords" ] || : >"$passwords"
if [ ! -e "$acl" ]; then
    cat >"$acl" <<EOF
# Mosquitto ACL for midbridge, made by compose/make-mid-user.sh from the templates in
# compose/mosquitto/. No topic line comes before the first user line, so a client without
# a user name gets no topic at all. One block per broker user; edit the templates, not this.

EOF
fi

# Check the ACL before touching the password: never reset the password of a user that
# serves another agent.
if grep -qxF "$marker" "$acl"; then
    acl_note="its ACL block was already in $acl"
    block=
else
    for name in $user $session_users; do
        if grep -qxF "user $name" "$acl"; then
            die "user $name already has an ACL block in $acl for another agent (one broker user per agent)"
        fi
    done
    block=$(sed -e '/^##/d' \
        -e "s|@AGENT@|$agent|g" \
        -e "s|@MID_USER@|$user|g" \
        -e "s|@PLATFORM_USER@|$user|g" \
        -e "s|@PREFIX@|$prefix|g" \
        "$templates/$kind.acl.template")
    acl_note="ACL block added to $acl"
fi

if [ -z "${MID_PASSWORD:-}" ] && [ -n "$session_users" ]; then
    # One password for the user and its session users: ask once, without echo.
    stty -echo 2>/dev/null || true
    printf 'Password for %s: ' "$user" >&2
    IFS= read -r MID_PASSWORD || MID_PASSWORD=
    stty echo 2>/dev/null || true
    printf '\n' >&2
    [ -n "$MID_PASSWORD" ] || die "empty password"
fi
for name in $user $session_users; do
    if [ -n "${MID_PASSWORD:-}" ]; then
        printf '%s\n%s\n' "$MID_PASSWORD" "$MID_PASSWORD" | "$passwd_bin" "$passwords" "$name" >/dev/null
    else
        "$passwd_bin" "$passwords" "$name"
    fi
done
if [ -n "$block" ]; then
    printf '%s\n\n' "$block" >>"$acl"
fi

echo "$user${session_users:+ (and $session_users)}: password set in $passwords; $acl_note."
echo "A running broker reads both files again on SIGHUP (compose: docker compose kill -s SIGHUP mosquitto)."
