// remove_stale_run_dirs: which run dirs a starting demo removes (a killed demo's) and which it
// leaves (a running demo's, one being created, anything else).
#include "cli/local_nodes.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace fs = std::filesystem;

namespace {

class run_dirs : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "moe-run-dirs-test-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    parent_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(parent_, ec);
  }

  // A run dir with a log and, unless pid_text is null, a pid file holding pid_text.
  fs::path make_dir(const std::string& name, const char* pid_text) {
    const auto dir = parent_ / name;
    fs::create_directory(dir);
    std::ofstream(dir / "n0.log") << "a node's log\n";
    if (pid_text) std::ofstream(dir / "demo.pid") << pid_text;
    return dir;
  }

  fs::path parent_;
};

// The pid of a process that has ended and been reaped: no process has it now (pids are not
// reused this soon on a Linux system, which hands them out in rising order).
std::string dead_pid() {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return std::to_string(pid) + "\n";
}

}  // namespace

TEST_F(run_dirs, a_killed_demos_dir_goes_and_every_other_stays) {
  const auto dead = dead_pid();
  const auto killed = make_dir("moe-demo-killed", dead.c_str());
  const auto running = make_dir("moe-demo-running", (std::to_string(::getpid()) + "\n").c_str());
  const auto starting = make_dir("moe-demo-starting", nullptr);
  const auto garbled = make_dir("moe-demo-garbled", "not a pid\n");
  const auto negative = make_dir("moe-demo-negative", "-1\n");
  const auto other = make_dir("someone-elses-dir", dead.c_str());
  // A link named like a run dir, to a dead demo's dir elsewhere: not followed.
  const auto target = make_dir("target", dead.c_str());
  fs::create_directory_symlink(target, parent_ / "moe-demo-link");

  EXPECT_EQ(moe::cli::remove_stale_run_dirs(parent_), 1u);
  EXPECT_FALSE(fs::exists(killed));
  for (const auto& kept : {running, starting, garbled, negative, other, target})
    EXPECT_TRUE(fs::exists(kept / "n0.log")) << kept;
  EXPECT_TRUE(fs::is_symlink(parent_ / "moe-demo-link"));
  // Nothing stale left: a second sweep removes nothing.
  EXPECT_EQ(moe::cli::remove_stale_run_dirs(parent_), 0u);
}

TEST_F(run_dirs, a_missing_parent_removes_nothing) {
  EXPECT_EQ(moe::cli::remove_stale_run_dirs(parent_ / "no-such-dir"), 0u);
}
