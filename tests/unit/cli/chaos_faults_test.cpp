// What `moe chaos netem|link` would run, without running it: the argv of each tc and nft call
// (the commands themselves are exercised by tests/fault/fault_network.sh, as root).
#include "cli/chaos_faults.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

using namespace moe;
using namespace moe::cli;
using argv = std::vector<std::string>;

namespace {

const argv in_ns{"/ip", "netns", "exec", "ns1"};

argv with_ns(std::initializer_list<std::string> tail) {
  argv a = in_ns;
  a.insert(a.end(), tail);
  return a;
}

TEST(chaos_link, a_rate_and_a_loss_replace_the_devices_link_fault) {
  link_spec s;
  s.rate_kbit = 2000;
  s.loss_pct = 2.5;
  const auto cmds = link_commands("/ip", "/tc", "/nft", "ns1", "veth-1", s);
  ASSERT_EQ(cmds.size(), 5u);
  // The previous drop rule goes first (there may be none: an undo may fail).
  EXPECT_EQ(cmds[0].argv, with_ns({"/nft", "delete", "table", "inet", "moe_chaos_veth_1"}));
  EXPECT_TRUE(cmds[0].undo);
  EXPECT_EQ(cmds[1].argv, with_ns({"/tc", "qdisc", "replace", "dev", "veth-1", "root", "tbf", "rate", "2000kbit",
                                   "burst", "70000", "latency", "5s"}));
  EXPECT_FALSE(cmds[1].undo);
  EXPECT_EQ(cmds[2].argv, with_ns({"/nft", "add", "table", "inet", "moe_chaos_veth_1"}));
  EXPECT_EQ(cmds[3].argv, with_ns({"/nft", "add", "chain", "inet", "moe_chaos_veth_1", "egress",
                                   "{ type filter hook output priority 0 ; policy accept ; }"}));
  // 2.5% is 25000 parts per million, on packets leaving this device only.
  EXPECT_EQ(cmds[4].argv, with_ns({"/nft", "add", "rule", "inet", "moe_chaos_veth_1", "egress", "oifname",
                                   "\"veth-1\"", "numgen", "random", "mod", "1000000", "<", "25000", "counter", "drop"}));
  for (size_t i = 2; i < cmds.size(); ++i) EXPECT_FALSE(cmds[i].undo);
}

TEST(chaos_link, a_fast_rate_gets_a_bucket_of_ten_milliseconds) {
  link_spec s;
  s.rate_kbit = 1e6;  // 1 Gbit/s: 10 ms is 1.25 MB
  const auto cmds = link_commands("/ip", "/tc", "/nft", "ns1", "eth0", s);
  ASSERT_EQ(cmds.size(), 2u);
  EXPECT_EQ(cmds[1].argv, with_ns({"/tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "1000000kbit",
                                   "burst", "1250000", "latency", "5s"}));
}

TEST(chaos_link, a_loss_alone_removes_a_rate_limit_and_clear_removes_both) {
  link_spec loss;
  loss.loss_pct = 1;
  auto cmds = link_commands("/ip", "/tc", "/nft", "ns1", "eth0", loss);
  ASSERT_EQ(cmds.size(), 5u);
  EXPECT_EQ(cmds[1].argv, with_ns({"/tc", "qdisc", "del", "dev", "eth0", "root"}));
  EXPECT_TRUE(cmds[1].undo);

  link_spec clear;
  clear.clear = true;
  cmds = link_commands("/ip", "/tc", "/nft", "ns1", "eth0", clear);
  ASSERT_EQ(cmds.size(), 2u);
  EXPECT_TRUE(cmds[0].undo && cmds[1].undo);
  EXPECT_EQ(cmds[0].argv[4], "/nft");
  EXPECT_EQ(cmds[1].argv, with_ns({"/tc", "qdisc", "del", "dev", "eth0", "root"}));
}

TEST(chaos_link, specs_out_of_range_or_contradictory_are_refused) {
  auto text = [](const link_spec& s) {
    auto err = check_link_spec(s);
    return err ? error_text(err) : std::string{};
  };
  link_spec none;
  EXPECT_NE(text(none).find("give --rate KBIT, --loss PCT (or both), or --clear"), std::string::npos);
  link_spec both;
  both.clear = true;
  both.loss_pct = 1;
  EXPECT_NE(text(both).find("--clear takes no --rate or --loss"), std::string::npos);
  link_spec slow;
  slow.rate_kbit = 4;
  EXPECT_NE(text(slow).find("--rate 4 is not a rate in [8, 1e8] kbit/s"), std::string::npos);
  link_spec nan;
  nan.loss_pct = std::nan("");
  EXPECT_NE(text(nan).find("is not a percentage in [0, 100]"), std::string::npos);
  link_spec ok;
  ok.rate_kbit = 8;
  ok.loss_pct = 100;
  EXPECT_EQ(text(ok), "");
}

TEST(chaos_netem, delay_jitter_and_loss_in_tcs_units) {
  netem_spec s;
  s.delay_ms = 20;
  s.jitter_ms = 5;
  s.loss_pct = 0.5;
  EXPECT_EQ(netem_argv("/ip", "/tc", "ns1", "eth0", s),
            with_ns({"/tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "20ms", "5ms", "loss", "0.5%"}));
  netem_spec clear;
  clear.clear = true;
  EXPECT_EQ(netem_argv("/ip", "/tc", "ns1", "eth0", clear), with_ns({"/tc", "qdisc", "del", "dev", "eth0", "root"}));
}

}  // namespace
